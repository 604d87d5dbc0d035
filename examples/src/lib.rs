//! Runnable examples of pipefuse's Rust API; see the `[[example]]` targets in Cargo.toml:
//! `cargo run --release -p examples --example local_pipeline`.
