//! The OpenAI-shaped types the broker reads and writes.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// A chat request; fields the broker does not use pass through to the upstream.
#[derive(Deserialize, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Value>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn of_completion(completion: &Value) -> Option<Self> {
        Self::deserialize(completion.get("usage")?).ok()
    }
}

pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Deserialize)]
struct WireToolCall {
    id: String,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

impl ToolCall {
    /// The tool calls of a non-streaming completion's first choice.
    pub fn all_of_completion(completion: &Value) -> Vec<Self> {
        let calls = &completion["choices"][0]["message"]["tool_calls"];
        let calls = Vec::<WireToolCall>::deserialize(calls).unwrap_or_default();
        calls
            .into_iter()
            .map(|call| ToolCall {
                id: call.id,
                name: call.function.name,
                arguments: call.function.arguments,
            })
            .collect()
    }

    /// The assistant message that asked for `calls`, as the next turn must repeat it.
    pub fn assistant_message(calls: &[Self]) -> Value {
        let calls: Vec<Value> = calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        json!({"role": "assistant", "content": null, "tool_calls": calls})
    }
}

/// A failure answered to the client; `error_type` is also what `request_end` reports.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: String) -> Self {
        Self {
            status,
            error_type,
            message,
        }
    }

    pub fn invalid_request(err: &serde_json::Error) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid chat request: {err}"),
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model '{model}' is not served by this broker"),
        )
    }

    pub fn tool_loop_exhausted(turns: u32) -> Self {
        let message = format!("the model still asked for tools after {turns} turns");
        Self::new(StatusCode::BAD_GATEWAY, "tool_loop_exhausted", message)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.error_type, "code": null}})
    }
}
