//! The tools the broker runs itself when a model asks for them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::api::ToolCall;
use crate::recorder::Recorder;

/// Runs `calls` (each inside its `tool.execute` stage) and appends the assistant's request
/// and the results to `messages`, ready for the next upstream turn.
pub async fn run_calls(recorder: &Recorder, calls: &[ToolCall], messages: &mut Vec<Value>) {
    messages.push(ToolCall::assistant_message(calls));
    for call in calls {
        let result = {
            let _tool = recorder.tool(&call.name);
            execute(&call.name, &call.arguments).await
        };
        messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": result}));
    }
}

async fn execute(name: &str, arguments: &str) -> String {
    match name {
        "get_time" => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            format!("{}.{:03}", now.as_secs(), now.subsec_millis())
        }
        "calculator" => sum_of_squares(arguments).to_string(),
        _ => {
            // Stands in for a remote tool: 1-3 ms, fixed per tool so runs are comparable.
            let millis = 1 + name.len() as u64 % 3;
            tokio::time::sleep(Duration::from_millis(millis)).await;
            format!("{name}: done")
        }
    }
}

/// The calculator's one operation, on `{"numbers": [...]}` (default 1..=100).
fn sum_of_squares(arguments: &str) -> f64 {
    let arguments: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
    match arguments["numbers"].as_array() {
        Some(numbers) => numbers
            .iter()
            .filter_map(Value::as_f64)
            .map(|n| n * n)
            .sum(),
        None => (1..=100).map(|n| f64::from(n * n)).sum(),
    }
}
