//! Helpers for the end-to-end tests live in `testbed`.
