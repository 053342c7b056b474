//! What brokerprobe tells its user while it runs (attached, first event, a process
//! exited, warnings): printed, or shown on the live view's status line while the live
//! view owns the terminal (a line printed then would tear its screen).

use std::{
    io::Write,
    sync::{Mutex, PoisonError, mpsc::Sender},
};

static LIVE_VIEW: Mutex<Option<Sender<String>>> = Mutex::new(None);

/// A line for the user: standard output, or the live view's status line.
pub fn say(line: impl Into<String>) {
    let line = line.into();
    match &*LIVE_VIEW.lock().unwrap_or_else(PoisonError::into_inner) {
        Some(live) => {
            let _ = live.send(line);
        }
        None => println!("{line}"),
    }
}

/// From now on notices and log lines go to `live`, until [`to_terminal`].
pub fn to_live_view(live: Sender<String>) {
    *LIVE_VIEW.lock().unwrap_or_else(PoisonError::into_inner) = Some(live);
}

pub fn to_terminal() {
    *LIVE_VIEW.lock().unwrap_or_else(PoisonError::into_inner) = None;
}

/// The log's output (env_logger's pipe): standard error, or the live view.
pub struct LogOutput;

impl Write for LogOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &*LIVE_VIEW.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(live) => {
                let text = String::from_utf8_lossy(buf);
                for line in text.lines().filter(|line| !line.is_empty()) {
                    let _ = live.send(line.to_owned());
                }
                Ok(buf.len())
            }
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
