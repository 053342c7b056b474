//! brokerprobe: attaches to a running LLM broker by PID and times its stages from outside.
//!
//! Data flows one way: [`attach`] (kernel) → [`decode`] → [`assembly`] → [`export`].
//! [`target`] finds what to attach to; [`run`] wires the pipeline together.

pub mod assembly;
pub mod attach;
pub mod decode;
pub mod export;
pub mod run;
pub mod server;
pub mod target;
