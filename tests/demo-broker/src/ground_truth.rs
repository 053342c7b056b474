//! Writes ground-truth JSON lines on a thread of its own, so request tasks never block on
//! file I/O.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Lines reach the file at most this long after they were written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

enum Message {
    Line(String),
    Close,
}

/// Where requests send their finished line.
#[derive(Clone)]
pub struct GroundTruthSink(Sender<Message>);

impl GroundTruthSink {
    pub fn write(&self, record: &impl Serialize) {
        match serde_json::to_string(record) {
            // Fails only after close(), when the broker is exiting anyway.
            Ok(line) => _ = self.0.send(Message::Line(line)),
            Err(err) => log::warn!("ground truth: cannot serialize a record: {err}"),
        }
    }
}

pub struct GroundTruthWriter {
    sink: GroundTruthSink,
    thread: JoinHandle<io::Result<()>>,
}

impl GroundTruthWriter {
    /// Truncates `path` and starts the writer thread.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = File::create(path)?;
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ground-truth".into())
            .spawn(move || write_lines(&receiver, BufWriter::new(file)))?;
        Ok(Self {
            sink: GroundTruthSink(sender),
            thread,
        })
    }

    pub fn sink(&self) -> &GroundTruthSink {
        &self.sink
    }

    /// Writes out every line sent so far and stops the thread. Lines sent later are lost.
    pub fn close(self) -> io::Result<()> {
        _ = self.sink.0.send(Message::Close);
        self.thread
            .join()
            .map_err(|_| io::Error::other("ground-truth writer panicked"))?
    }
}

fn write_lines(receiver: &Receiver<Message>, mut out: BufWriter<File>) -> io::Result<()> {
    let mut unflushed_since: Option<Instant> = None;
    loop {
        let message = match unflushed_since {
            None => receiver.recv().map_err(RecvTimeoutError::from),
            Some(since) => receiver.recv_timeout(FLUSH_INTERVAL.saturating_sub(since.elapsed())),
        };
        match message {
            Ok(Message::Line(line)) => {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
                unflushed_since.get_or_insert_with(Instant::now);
            }
            Ok(Message::Close) | Err(RecvTimeoutError::Disconnected) => return out.flush(),
            Err(RecvTimeoutError::Timeout) => {}
        }
        if unflushed_since.is_some_and(|since| since.elapsed() >= FLUSH_INTERVAL) {
            out.flush()?;
            unflushed_since = None;
        }
    }
}
