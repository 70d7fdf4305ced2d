"""``python -m pagedllm.bench throughput | latency | serve | plot``."""

import sys

from pagedllm.bench.cli import main

sys.exit(main())
