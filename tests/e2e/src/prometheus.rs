//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`),
//! started on a loopback port to scrape brokerprobe, and `promtool`.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::harness::Proc;

/// How often the test Prometheus scrapes.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Prometheus {
    _server: Proc,
    base_url: String,
}

/// One sample of an instant vector: its labels and value.
pub type Sample = (HashMap<String, String>, f64);

impl Prometheus {
    /// Starts Prometheus scraping `target` (HOST:PORT serving /metrics) every
    /// [`SCRAPE_INTERVAL`], with its data in `dir`; returns once it is ready.
    pub async fn start(target: &str, dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let config = dir.join("prometheus.yml");
        let interval = format!("{}s", SCRAPE_INTERVAL.as_secs());
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n\
                 scrape_configs:\n  - job_name: brokerprobe\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )?;
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let server = Proc::spawn(
            "prometheus",
            Command::new("prometheus").args([
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address={listen}"),
                "--log.level=warn",
            ]),
        )
        .context("starting prometheus (Debian package, installed by cargo xtask setup)")?;
        let prometheus = Self {
            _server: server,
            base_url: format!("http://{listen}"),
        };
        prometheus.wait_ready().await?;
        Ok(prometheus)
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("{}/-/ready", self.base_url)).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("prometheus on {} not ready after 30 s", self.base_url);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Evaluates `promql` now; returns the instant vector.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let response: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.base_url))
            .query(&[("query", promql)])
            .send()
            .await?
            .json()
            .await?;
        if response["status"] != "success" {
            bail!("query {promql:?} failed: {response}");
        }
        let result = response["data"]["result"]
            .as_array()
            .with_context(|| format!("query {promql:?}: not a vector: {response}"))?;
        result
            .iter()
            .map(|sample| {
                let labels = sample["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let value = sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("query {promql:?}: bad sample {sample}"))?;
                Ok((labels, value))
            })
            .collect()
    }

    /// The value of a query that yields one sample (e.g. `sum(...)`); None if it yields
    /// none.
    pub async fn value(&self, promql: &str) -> Result<Option<f64>> {
        let samples = self.query(promql).await?;
        match samples.as_slice() {
            [] => Ok(None),
            [(_, value)] => Ok(Some(*value)),
            more => bail!("query {promql:?} yields {} samples", more.len()),
        }
    }

    /// Waits until `promql` yields `expected` (scrapes come every second; the first
    /// some seconds after start).
    pub async fn wait_for(&self, promql: &str, expected: f64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.value(promql).await?;
            if value == Some(expected) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{promql} is {value:?} after 30 s, expected {expected}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A loopback port nobody listens on now (Prometheus cannot be told to pick one).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `promtool check metrics` on an exposition: it must pass and say nothing.
pub fn promtool_check(metrics: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus, installed by cargo xtask setup)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(metrics.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!("promtool check metrics ({}): {said}", out.status);
    }
    Ok(())
}
