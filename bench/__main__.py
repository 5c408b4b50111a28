"""Run every benchmark: ``python -m bench``."""
from bench import bench_luigi_workers, bench_proposal_settings, bench_proposals

if __name__ == "__main__":
    bench_proposals.main()
    bench_luigi_workers.main()
    bench_proposal_settings.main()
