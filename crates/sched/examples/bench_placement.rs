//! Prints the placement benchmark at 100 / 1,000 / 10,000 servers.
//! `cargo run --release -p sched --example bench_placement [DECISIONS] [SEED]`

fn main() {
    let mut args = std::env::args().skip(1);
    let decisions = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let seed = args.next().and_then(|a| a.parse().ok()).unwrap_or(6);
    let rows = sched::bench_table(decisions, seed);
    print!("{}", sched::format_table(&rows));
}
