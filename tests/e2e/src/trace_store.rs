//! The tests' OTLP receiver: `trace-store` (otlp-embedded's in-memory store behind OTLP/gRPC
//! and OTLP/HTTP), read back through Jaeger's query API.

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::harness::{Proc, bin, start_listening};

pub struct TraceStore {
    pub process: Proc,
    /// HOST:PORT of OTLP/gRPC, OTLP/HTTP and the Jaeger API.
    pub grpc: String,
    pub http: String,
    pub ui: String,
}

impl TraceStore {
    /// Starts one; `http` fixes the OTLP/HTTP address (to restart it where it was).
    pub fn start(http: Option<&str>) -> Result<Self> {
        let mut command = Command::new(bin("trace-store"));
        if let Some(http) = http {
            command.args(["--http", http]);
        }
        let (process, ui) = start_listening("trace-store", &mut command)?;
        let address = |prefix: &str| -> Result<String> {
            process
                .stdout
                .iter()
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::to_owned)
                .with_context(|| format!("trace-store printed no {prefix:?} line"))
        };
        Ok(Self {
            grpc: address("grpc on ")?,
            http: address("http on ")?,
            process,
            ui,
        })
    }

    /// The brokerprobe flags that export to this store over `protocol`.
    pub fn endpoint_args(&self, protocol: &str) -> Vec<String> {
        let endpoint = match protocol {
            "grpc" => format!("http://{}", self.grpc),
            _ => format!("http://{}/v1/traces", self.http),
        };
        vec![
            "--otlp-endpoint".into(),
            endpoint,
            "--otlp-protocol".into(),
            protocol.into(),
        ]
    }

    /// Every complete trace (all parents present) of `service`, Jaeger JSON.
    pub async fn traces(&self, service: &str) -> Result<Vec<Value>> {
        let url = format!(
            "http://{}/api/traces?service={service}&limit=1000000",
            self.ui
        );
        let body: Value = reqwest::get(&url).await?.json().await?;
        match body["data"].as_array() {
            Some(traces) => Ok(traces.clone()),
            None => bail!("{url}: {body}"),
        }
    }

    /// One trace by id (also one whose root's parent is elsewhere); None if unknown.
    pub async fn trace(&self, trace_id: &str) -> Result<Option<Value>> {
        let response = reqwest::get(format!("http://{}/api/traces/{trace_id}", self.ui)).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: Value = response.error_for_status()?.json().await?;
        Ok(body["data"].get(0).cloned())
    }
}

/// A span's tag value.
pub fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}
