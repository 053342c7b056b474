//! The live terminal view (`attach --tui`, `brokerprobe top`): requests/s, errors and
//! in-flight; per stage p50/p95/p99 with a sparkline of each second's p99; per model or
//! per upstream (TTFB, and the broker-seen wait against it); the slowest requests, and
//! one's stage waterfall (w). Drawn from the summary once a second on its own thread, so
//! a slow terminal never holds up the event loop. Fits 80x24; more rows show more.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use hdrhistogram::Histogram;
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Sparkline, Table},
};

use super::{
    report::{SlowRequest, format_seconds},
    summary::{GroupLine, LiveFigures, SharedSummary, format_ns, lock},
};
use crate::notice;

/// Seconds of p99 history each stage's sparkline keeps (wider terminals show more).
const HISTORY: usize = 120;
/// Slowest requests listed at most.
const SLOWEST_SHOWN: usize = 5;
const REFRESH: Duration = Duration::from_secs(1);
/// Widths of the stage table's columns; the sparkline takes the rest of the line.
const STAGE_COLUMNS: [u16; 5] = [24, 8, 9, 9, 9];

pub struct LiveView {
    thread: JoinHandle<Result<()>>,
    stop: Arc<AtomicBool>,
}

impl LiveView {
    /// Takes over the terminal; `quit` fires when the user asks to stop (q, Esc, Ctrl-C).
    pub fn start(
        summary: SharedSummary,
        title: String,
        quit: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> Result<Self> {
        let terminal = ratatui::try_init().context("taking over the terminal for --tui")?;
        let (notices, notes) = mpsc::channel();
        notice::to_live_view(notices);
        // From here on, however the view ends (an error, a panic, a thread that never
        // started), the terminal and the notices are given back.
        let owned = TerminalOwned;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("brokerprobe-tui".into())
            .spawn(move || {
                let result = run(terminal, &summary, &title, &notes, &quit, &stopping);
                drop(owned);
                // What came while the view was closing has not been seen yet.
                for note in notes.try_iter() {
                    notice::say(note);
                }
                result
            })
            .context("starting the live view")?;
        Ok(Self { thread, stop })
    }

    /// Gives the terminal back (the report is printed after this).
    pub fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the live view panicked"))?
    }
}

/// Held while the view owns the terminal; gives it back when dropped.
struct TerminalOwned;

impl Drop for TerminalOwned {
    fn drop(&mut self) {
        notice::to_terminal();
        ratatui::restore();
    }
}

fn run(
    mut terminal: DefaultTerminal,
    summary: &SharedSummary,
    title: &str,
    notes: &mpsc::Receiver<String>,
    quit: &tokio::sync::mpsc::UnboundedSender<()>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut view = View::new(title);
    let mut next_sample = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_sample {
            if !view.frozen {
                let figures = lock(summary).live(SLOWEST_SHOWN);
                view.sample(figures);
            }
            // After a stall, the next second from now, not a burst of catching up.
            next_sample = (next_sample + REFRESH).max(Instant::now());
        }
        if let Some(note) = notes.try_iter().last() {
            view.note = note;
        }
        terminal.draw(|frame| view.draw(frame))?;
        let wait = next_sample
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        if event::poll(wait)?
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
        {
            match key.code {
                KeyCode::Char('q') | KeyCode::Esc => view.quit(quit),
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    view.quit(quit);
                }
                KeyCode::Char('f') => view.toggle_freeze(),
                KeyCode::Char('g') => view.by_upstream = !view.by_upstream,
                KeyCode::Char('w') => view.waterfall = !view.waterfall,
                KeyCode::Char(digit @ '1'..='5') => {
                    view.waterfall = true;
                    view.chosen = digit as usize - '1' as usize;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

struct View {
    title: String,
    figures: Option<LiveFigures>,
    /// Each stage's histogram at the previous sample: this second's = now − then.
    previous: HashMap<String, Histogram<u64>>,
    p99_history: HashMap<String, VecDeque<u64>>,
    sampled_at: Option<(Instant, u64, u64)>,
    /// The next sample only sets the baseline (after a freeze: the frozen time is not a
    /// second of the sparkline).
    rebase: bool,
    requests_per_second: f64,
    errors_per_second: f64,
    frozen: bool,
    by_upstream: bool,
    /// The lower half shows a slow request's waterfall (the `chosen`-th slowest).
    waterfall: bool,
    chosen: usize,
    quitting: bool,
    note: String,
}

impl View {
    fn new(title: &str) -> Self {
        Self {
            title: title.to_owned(),
            figures: None,
            previous: HashMap::new(),
            p99_history: HashMap::new(),
            sampled_at: None,
            rebase: false,
            requests_per_second: 0.0,
            errors_per_second: 0.0,
            frozen: false,
            by_upstream: false,
            waterfall: false,
            chosen: 0,
            quitting: false,
            note: String::new(),
        }
    }

    fn quit(&mut self, quit: &tokio::sync::mpsc::UnboundedSender<()>) {
        self.quitting = true;
        let _ = quit.send(());
    }

    fn toggle_freeze(&mut self) {
        self.frozen = !self.frozen;
        self.rebase = !self.frozen;
    }

    fn sample(&mut self, figures: LiveFigures) {
        let now = Instant::now();
        if std::mem::take(&mut self.rebase) {
            self.sampled_at = Some((now, figures.completed, figures.errors));
            for (stage, histogram) in &figures.stages {
                self.previous.insert(stage.clone(), histogram.clone());
            }
            self.figures = Some(figures);
            return;
        }
        if let Some((then, completed, errors)) = self.sampled_at {
            let seconds = now.duration_since(then).as_secs_f64().max(1e-3);
            self.requests_per_second = (figures.completed - completed) as f64 / seconds;
            self.errors_per_second = (figures.errors - errors) as f64 / seconds;
        }
        self.sampled_at = Some((now, figures.completed, figures.errors));
        for (stage, histogram) in &figures.stages {
            let mut this_second = histogram.clone();
            let p99 = match self.previous.get(stage) {
                Some(before) if this_second.subtract(before).is_ok() => {
                    this_second.value_at_quantile(0.99)
                }
                Some(_) => 0,
                None => histogram.value_at_quantile(0.99),
            };
            let history = self.p99_history.entry(stage.clone()).or_default();
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(p99);
            self.previous.insert(stage.clone(), histogram.clone());
        }
        self.figures = Some(figures);
    }

    fn draw(&self, frame: &mut Frame) {
        let Some(figures) = &self.figures else {
            frame.render_widget(
                Paragraph::new("brokerprobe: waiting for figures…"),
                frame.area(),
            );
            return;
        };
        let stage_rows = figures.stages.len().min(12) as u16;
        let groups = if self.by_upstream {
            &figures.upstreams
        } else {
            &figures.models
        };
        let group_rows = groups.len().clamp(1, 4) as u16 + u16::from(self.by_upstream);
        let [header, stages, lower, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(stage_rows + 2),
            Constraint::Min(4),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(self.header_line(figures), header);
        self.draw_stages(frame, stages, figures);
        if self.waterfall {
            draw_waterfall(frame, lower, &figures.slowest, self.chosen);
        } else {
            let [grouping, slowest] =
                Layout::vertical([Constraint::Length(group_rows + 2), Constraint::Min(2)])
                    .areas(lower);
            self.draw_grouping(frame, grouping, figures, groups);
            draw_slowest(frame, slowest, &figures.slowest);
        }
        let keys = if self.quitting {
            "detaching…".to_owned()
        } else {
            format!(
                "q quit f {} g by {} {}",
                if self.frozen { "resume" } else { "freeze" },
                if self.by_upstream {
                    "model"
                } else {
                    "upstream"
                },
                if self.waterfall {
                    "w back"
                } else {
                    "w/1-5 waterfall"
                }
            )
        };
        frame.render_widget(
            Paragraph::new(format!("{keys} │ {}", self.note))
                .style(Style::new().add_modifier(Modifier::REVERSED)),
            footer,
        );
    }

    fn header_line(&self, figures: &LiveFigures) -> Paragraph<'_> {
        // Frozen first, where a narrow terminal cannot cut it off.
        let text = format!(
            "{}{} · {:.1} req/s · {:.1} err/s · {} in flight · {} done",
            if self.frozen { "FROZEN · " } else { "" },
            self.title,
            self.requests_per_second,
            self.errors_per_second,
            figures.in_flight,
            figures.completed
        );
        Paragraph::new(text).style(Style::new().add_modifier(Modifier::BOLD))
    }

    fn draw_stages(&self, frame: &mut Frame, area: Rect, figures: &LiveFigures) {
        let block = Block::new()
            .borders(Borders::TOP)
            .title(" stages since attach · p99 each second → ");
        let inner = block.inner(area);
        frame.render_widget(block, area);
        let table_width: u16 = STAGE_COLUMNS.iter().sum::<u16>() + STAGE_COLUMNS.len() as u16;
        let [table_area, spark_area] =
            Layout::horizontal([Constraint::Length(table_width), Constraint::Min(0)]).areas(inner);
        let rows = figures.stages.iter().map(|(stage, histogram)| {
            let q = |q: f64| quantile_cell(histogram, q);
            Row::new([
                stage.clone(),
                histogram.len().to_string(),
                q(0.5),
                q(0.95),
                q(0.99),
            ])
        });
        let header = Row::new(["stage", "count", "p50", "p95", "p99"])
            .style(Style::new().add_modifier(Modifier::UNDERLINED));
        frame.render_widget(
            Table::new(rows, STAGE_COLUMNS.map(Constraint::Length)).header(header),
            table_area,
        );
        for (i, (stage, _)) in figures.stages.iter().enumerate() {
            let y = spark_area.y + 1 + i as u16;
            if y >= spark_area.bottom() {
                break;
            }
            let Some(history) = self.p99_history.get(stage) else {
                continue;
            };
            let width = spark_area.width as usize;
            let shown: Vec<u64> = history
                .iter()
                .skip(history.len().saturating_sub(width))
                .copied()
                .collect();
            let row = Rect::new(spark_area.x, y, spark_area.width, 1);
            frame.render_widget(Sparkline::default().data(&shown), row);
        }
    }

    fn draw_grouping(
        &self,
        frame: &mut Frame,
        area: Rect,
        figures: &LiveFigures,
        groups: &[GroupLine],
    ) {
        let (title, columns) = if self.by_upstream {
            (
                " by upstream: network TTFB ",
                ["upstream", "exchanges", "", "ttfb p50", "p95", "p99"],
            )
        } else {
            (
                " by model: request duration ",
                ["model", "requests", "errors", "p50", "p95", "p99"],
            )
        };
        let block = Block::new().borders(Borders::TOP).title(title);
        let inner = block.inner(area);
        frame.render_widget(block, area);
        let rows = groups.iter().map(|group| {
            let [p50, p95, p99] = group.quantiles_ns.map(|ns| {
                if group.count == 0 {
                    "-".to_owned()
                } else {
                    format_ns(ns)
                }
            });
            Row::new([
                group.name.clone(),
                group.count.to_string(),
                group.errors.map_or_else(String::new, |e| e.to_string()),
                p50,
                p95,
                p99,
            ])
        });
        let widths = [24, 10, 8, 10, 10, 10].map(Constraint::Length);
        let header = Row::new(columns).style(Style::new().add_modifier(Modifier::UNDERLINED));
        let mut table_area = inner;
        if self.by_upstream {
            table_area.height = table_area.height.saturating_sub(1);
            let spread = |figures: Option<(u64, u64)>| {
                figures.map_or_else(
                    || "-".to_owned(),
                    |(p50, p99)| format!("p50 {} p99 {}", format_ns(p50), format_ns(p99)),
                )
            };
            let line = format!(
                "same calls: broker-seen wait {} · network TTFB {}",
                spread(figures.broker_wait),
                spread(figures.network_ttfb)
            );
            let last = Rect::new(inner.x, inner.bottom().saturating_sub(1), inner.width, 1);
            frame.render_widget(Paragraph::new(line), last);
        }
        frame.render_widget(Table::new(rows, widths).header(header), table_area);
    }
}

/// The slowest requests, one line each.
fn draw_slowest(frame: &mut Frame, area: Rect, slowest: &[SlowRequest]) {
    let block = Block::new()
        .borders(Borders::TOP)
        .title(" slowest requests since attach (trace id) ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let mut lines: Vec<Line> = slowest
        .iter()
        .enumerate()
        .map(|(rank, request)| slow_line(rank, request))
        .collect();
    if lines.is_empty() {
        lines.push(Line::from("no request finished yet"));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

fn slow_line(rank: usize, request: &SlowRequest) -> Line<'static> {
    Line::from(format!(
        "{} {:>9} {:>3} {:<22.22} {}",
        rank + 1,
        format_seconds(request.duration_seconds),
        request.status,
        request.model,
        request.trace_id.as_deref().unwrap_or("(not traced)")
    ))
}

/// The `chosen`-th slowest request's stages on its time line.
fn draw_waterfall(frame: &mut Frame, area: Rect, slowest: &[SlowRequest], chosen: usize) {
    let block = Block::new()
        .borders(Borders::TOP)
        .title(format!(" waterfall of slowest request {} ", chosen + 1));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(request) = slowest.get(chosen) else {
        frame.render_widget(Paragraph::new("no such request yet"), inner);
        return;
    };
    let mut lines = vec![slow_line(chosen, request)];
    let bar_width = usize::from(inner.width.saturating_sub(37).max(8));
    for (stage, lead, bar) in request.waterfall(bar_width) {
        lines.push(Line::from(format!(
            "  {:<24.24} {:>9} {}{}",
            stage.stage,
            format_seconds(stage.duration_seconds),
            " ".repeat(lead),
            "█".repeat(bar)
        )));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

fn quantile_cell(histogram: &Histogram<u64>, q: f64) -> String {
    if histogram.is_empty() {
        return "-".to_owned();
    }
    format_ns(histogram.value_at_quantile(q))
}
