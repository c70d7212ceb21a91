//! Progress bars for long work: drawn on a terminal, hidden when stderr is a file (Slurm output),
//! where `tracing` lines report progress instead.

/// A bar of `len` steps counted in `unit` (e.g. `images`, `tensors`), labelled `msg`.
pub fn bar(msg: &str, len: usize, unit: &str) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    let template =
        format!("{{msg:>16}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(msg.to_string());
    bar
}
