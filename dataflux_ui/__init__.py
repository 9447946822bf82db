"""DataFlux for Eureka-Audio Studio: raw audio → verified multiple-choice training data (reference doc section 6).

Store (``store``, ``models``), pipeline steps (``captioner``, ``questions``, ``answers``, ``judge``), engines
(``pipeline`` local, ``ray_engine``), export/import, review logic (``review``, ``auth``) and quality measurement.
Run ``python -m dataflux_ui --help``; see docs/dataflux.md.
"""

from .store import AuditLogError, Store, open_store

__all__ = ["AuditLogError", "Store", "open_store"]
