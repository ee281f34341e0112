"""Training zoo models on image folders: the loop (``loop``), the data (``data``) and the
RepOpt-VGG pipeline (``repopt``). Imported only by ``deploykit train``; needs torch.
"""
from __future__ import annotations
