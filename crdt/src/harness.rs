//! Multi-peer test harness.
