"""What the evaluation stage (tasks/evaluate.py) is made of: sampling each policy on the held-out prompts
(sampling.py), the numbers it reports, as pure functions (metrics.py), and what people read: tables, plots and the
report (report.py).

Imports runtime/ (the progress bar), tracking/, data/ and models/; never another stage module or flows/.
"""
