"""The DELTA paper's analyses for any set of deltatl runs; each writes PNG + SVG figures and its numbers.

==============================  =====================================================  =====================
module                          what                                                   files
==============================  =====================================================  =====================
:mod:`.curves`                  validation top-1, training loss, lr against steps       learning_curves.*
:mod:`.distance`                distance of every conv filter from its start, by stage  distance*.*
:mod:`.activations`             normalised activation maps of weak source channels     activation_maps.*
:mod:`.keypoints`               normalised activation at annotated part locations      keypoints.*
:mod:`.attention`               DELTA channel weights per layer                         attention.*
:mod:`.rifle`                   accuracy and head norm around RIFLE re-initialisations  rifle.*
==============================  =====================================================  =====================

The numbers come from plain functions (``filter_distances``, ``minmax_normalize``,
``keypoint_activation``, ``curve_rows``, ``weight_stats``, ``around_events``...) that take explicit
arguments; the ``*_analysis`` functions read runs, write the files and return an
:class:`~deltatl.analysis.plotting.AnalysisResult` for :mod:`deltatl.report`.
"""
from .runs import Run, load_run, load_runs

__all__ = ["Run", "load_run", "load_runs"]
