//! Real MariaDB instances for tests, the demo and benchmarks (filled in by the tier work).
