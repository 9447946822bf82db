"""Eureka-Audio Studio's Gradio app: one module per tab (``asr``, ``qa``, ``caption``, ``routing``), shared helpers in
``common``, the Blocks in ``ui``. ``python app.py`` (the repository root) starts it."""
