"""Ray orchestration: join or start a cluster and launch the Ray Train job of DeepSpeed workers."""
