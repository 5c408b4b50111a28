"""Run every benchmark: ``python -m bench`` (the ablation table is ``python -m bench.ablation``)."""
from bench import (bench_features, bench_fold, bench_kernels, bench_luigi_workers, bench_mkl_vendor,
                   bench_proposal_settings, bench_proposals, bench_rpn_nms, bench_spp)

if __name__ == "__main__":
    bench_proposals.main()
    bench_luigi_workers.main()
    bench_proposal_settings.main()
    bench_features.main()
    bench_spp.main()
    bench_kernels.main()
    bench_mkl_vendor.main()
    bench_fold.main()
    bench_rpn_nms.main()
