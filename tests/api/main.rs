//! One integration-test binary: every test spawns the real app (port 0, its own SQLite file,
//! its own queue names) against the real RabbitMQ on this machine.

mod cli;
mod delivery;
mod erp;
// Shared harness: not every test module uses every helper.
#[allow(dead_code)]
mod helpers;
mod ops;
mod resilience;
