"""`evo-sft compare`: one experiment searched by each strategy (this evolution, and Ray Tune's
PBT, ASHA, random search and an lr grid) at an equal budget of supervised training tokens.

budget      what a token budget is and how trials share one
strategies  the strategies' names and each baseline's configurations and scheduler
trial       the Tune trainable: one member trained and scored as a run's members are
runner      runs every strategy and seed, records them in MLflow
report      the table, the summary over seeds and the plot
"""
