"""`make run`: start the Studio app if present; until then, run the CLI on a clip generated here."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_clip() -> Path:
    """A short spoken sentence from espeak-ng (a tone if espeak-ng is missing)."""
    path = Path(tempfile.mkdtemp()) / "demo.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(path), "The quick brown fox jumps over the lazy dog."], check=True)
    else:
        import numpy as np
        import soundfile as sf

        t = np.arange(32000) / 16000
        sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32"), 16000)
    return path


def main() -> int:
    if (ROOT / "app.py").is_file():
        return subprocess.call([sys.executable, str(ROOT / "app.py"), *sys.argv[1:]])
    clip = demo_clip()
    print(f"No app yet: running the CLI on {clip}")
    return subprocess.call([sys.executable, "-m", "model", "--audio", str(clip), "--task", "asr", "--stream"], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
