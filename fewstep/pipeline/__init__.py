"""The pipeline machinery: stage code closures, Merkle keys, the team store, stage runs, hashing, locks and
input digests. It imports no torch and no ML module: `fewstep deps` and the flow stay light."""
