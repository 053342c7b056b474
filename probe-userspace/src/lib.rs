//! brokerprobe: attaches to a running LLM broker by PID and times its stages from outside.
//!
//! Data flows one way: [`attach`] (kernel) → [`decode`] → [`connections`] (socket events
//! → exchanges) → [`assembly`] (marker events and exchanges → requests, with
//! [`attribution`]'s evidence of which request each upstream exchange served) → [`export`].
//! [`target`] and [`procnet`] find what to attach to; [`run`] wires the pipeline together.

pub mod assembly;
pub mod attach;
pub mod attribution;
pub mod clock;
pub mod connections;
pub mod decode;
pub mod export;
pub mod http;
pub mod inspect;
pub mod notice;
pub mod pidfd;
pub mod procnet;
pub mod run;
pub mod semaphore;
pub mod server;
pub mod symbols;
pub mod target;
pub mod toml_file;
pub mod usdt;
