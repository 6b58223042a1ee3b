"""Plumbing shared by the recipes and the benchmark scripts, kept out of the ``hf_backdoor`` package: the reference
trainings (``runs``, ``vision``), result records (``records``, ``btu_records``), the sanitize recipes' repair loop
(``repair``) and what every recipe does at start (``launch``)."""
