//! The conformance suite every [`crate::Store`] implementation runs.
//!
//! Each check is a plain async function taking a fresh, empty store, so a backend's
//! test file calls them one by one (see `store-redb/tests`). Filled in by the
//! store implementations' work.
