//! Where endpoints come from, and how they become routing tables.
//!
//! Sources ([`file`], local [`process`] replicas) send [`index::Event`]s to the
//! [`index::Index`], which folds them into its state and publishes tables into the proxy.

pub mod file;
pub mod index;
pub mod process;
