"""Knowledge editing: facts written into the weights in closed form (ROME; MEMIT and AlphaEdit to come).

- ``requests``: edit requests in the CounterFact and zsRE schemas;
- ``layout``: which modules an editor reads and writes (module-name templates, never model names);
- ``activations``: the subject's last token, a module's input/output at chosen positions;
- ``contexts``: the model-sampled context templates keys are averaged over;
- ``covariance``: C = E[k k^T] of the edited module's inputs over a corpus, cached;
- ``rome``: ROME's rank-one update;
- ``history``: the exact weight change of each task, and rollback.
"""
