//! Real-socket tests of the QUIC transport, loopback only. One test binary (modules below) to keep
//! link time and run time small.

mod bench;
mod common;
mod control;
mod control_faults;
mod exchange;
mod failure;
mod rejoin;
mod security;
mod strangers;
