//! Prints the `vinfra bench vswitch` table (root needed for the veth rows):
//! `cargo run --release -p net --example bench_vswitch [SECONDS_PER_ROW]`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secs: f64 = std::env::args().nth(1).map_or(Ok(2.0), |s| s.parse())?;
    let cfg = net::bench::BenchConfig {
        duration: std::time::Duration::from_secs_f64(secs),
        ..Default::default()
    };
    print!("{}", net::bench::bench_vswitch(&cfg)?);
    Ok(())
}
