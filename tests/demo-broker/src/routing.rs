//! The broker's built-in model routing table.

/// Where a model is served, and which model takes over when its upstream fails.
pub struct Route {
    pub model: &'static str,
    pub provider: &'static str,
    pub fallback: Option<&'static str>,
}

pub const ROUTES: &[Route] = &[
    Route {
        model: "gpt-fast",
        provider: "openai",
        fallback: None,
    },
    Route {
        model: "claude-slow",
        provider: "anthropic",
        fallback: None,
    },
    // Its upstream always fails under --fake, so every request exercises the fallback.
    Route {
        model: "flaky",
        provider: "openai",
        fallback: Some("gpt-fast"),
    },
];

/// The `route` stage's work. A function of its own in the binary, as a broker's stage
/// functions usually are: brokerprobe's symbol mode times its calls
/// (tests/demo-broker/symbol-map.toml).
#[inline(never)]
pub fn lookup(model: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|route| route.model == model)
}

/// The distinct providers, in table order.
pub fn providers() -> impl Iterator<Item = &'static str> {
    ROUTES.iter().enumerate().filter_map(|(i, route)| {
        let first_seen = !ROUTES[..i]
            .iter()
            .any(|earlier| earlier.provider == route.provider);
        first_seen.then_some(route.provider)
    })
}
