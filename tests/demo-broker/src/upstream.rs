//! The HTTP client to the providers' OpenAI-compatible API (one keep-alive pool).

use std::time::Duration;

use axum::http::StatusCode;
use probe_markers::RequestId;

use crate::api::{ApiError, ChatRequest};

pub struct Upstream {
    client: reqwest::Client,
    chat_url: String,
}

impl Upstream {
    /// `base_url` is the server root, e.g. `http://127.0.0.1:8080`.
    pub fn new(base_url: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let chat_url = format!("{}/v1/chat/completions", base_url.trim_end_matches('/'));
        Ok(Self { client, chat_url })
    }

    /// Sends the request; resolves when the response head has arrived. The request id
    /// goes upstream in `x-request-id`, as brokers commonly do (and the tests' ground truth
    /// relies on).
    pub async fn send(
        &self,
        request_id: RequestId,
        api_key: &str,
        request: &ChatRequest,
    ) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(&self.chat_url)
            .header("x-request-id", request_id.get())
            .bearer_auth(api_key)
            .json(request)
            .send()
            .await
    }
}

pub enum UpstreamFailure {
    Status(StatusCode),
    Transport(reqwest::Error),
    InvalidBody(serde_json::Error),
}

impl UpstreamFailure {
    /// Whether another model may succeed where this one failed.
    pub fn warrants_fallback(&self) -> bool {
        matches!(self, UpstreamFailure::Status(status)
            if status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS)
    }
}

impl From<reqwest::Error> for UpstreamFailure {
    fn from(err: reqwest::Error) -> Self {
        UpstreamFailure::Transport(err)
    }
}

impl From<serde_json::Error> for UpstreamFailure {
    fn from(err: serde_json::Error) -> Self {
        UpstreamFailure::InvalidBody(err)
    }
}

impl From<UpstreamFailure> for ApiError {
    fn from(failure: UpstreamFailure) -> Self {
        match failure {
            UpstreamFailure::Status(StatusCode::TOO_MANY_REQUESTS) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "the provider is rate limiting".into(),
            ),
            UpstreamFailure::Status(status) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("the provider answered {status}"),
            ),
            UpstreamFailure::Transport(err) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("provider request failed: {err}"),
            ),
            UpstreamFailure::InvalidBody(err) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_invalid_response",
                format!("the provider's answer is not a chat completion: {err}"),
            ),
        }
    }
}
