//! store-redb
