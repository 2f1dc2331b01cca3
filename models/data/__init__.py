"""Labelled data and what is measured on it: datasets without torch, evaluation, eval.json's metrics
and the HTML report."""
