//! Print the composed config for a FusionBench command line, like `fusion_bench ... --cfg job`.
//! usage: cargo run --release --example compose_config -- [overrides...] [--resolve]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dirs = fusion_bench::config::default_config_dirs();
    match fusion_bench::config::compose_from_args(&args, &dirs) {
        Ok(c) => match c.to_yaml() {
            Ok(y) => print!("{y}"),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1)
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}
