//! Model tests on synthetic time: a [`harness::World`] drives a `Model`
//! with commands, check results, data-plane counters, reloads and ticks,
//! and each test asserts the published tables and the typed replies.
//! Nothing sleeps, binds or reads a clock.

mod harness;
mod scenarios;
mod sessions;
