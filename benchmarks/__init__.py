"""kvpipe's benchmarks: ``kvpipe bench extract`` (extract_bench) and the scripts whose figures are
in docs/BENCHMARKS.md (``python -m kvpipe.benchmarks.NAME --help``)."""
