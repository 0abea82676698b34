//! End-to-end test harness for the Distr agent.

pub mod hubsim;
