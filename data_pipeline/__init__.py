"""Data on disk → batches on each rank: MXNet RecordIO, the packer, .bin verification sets,
synthetic identities, and the DALI pipeline."""
