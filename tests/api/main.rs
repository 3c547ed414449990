//! One integration-test binary: every test spawns the real app (port 0, its own SQLite file,
//! its own queue names) against the real RabbitMQ on this machine.

pub mod akinon;
mod cli;
mod consent_truth;
mod consents;
mod dead_letters;
pub mod delivery;
pub mod erp;
mod faults;
// Shared harness: not every test module uses every helper.
#[allow(dead_code)]
mod helpers;
mod listener;
mod loymax;
mod ops;
mod postgres;
pub mod resilience;
pub mod store_conformance;
