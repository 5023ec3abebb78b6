//! The report: for each line the median time, its throughput over the virtual disk, the ratio
//! to the baseline measured in the same run, and peak memory.

use crate::measure::{Sample, Step};

#[derive(serde::Serialize)]
pub struct Row {
    pub name: &'static str,
    pub median_seconds: f64,
    /// Virtual-disk bytes per second, in MB/s (10^6).
    pub megabytes_per_second: f64,
    /// Throughput as a fraction of the baseline's.
    pub ratio_to_baseline: f64,
    pub peak_memory_bytes: Option<u64>,
    pub seconds: Vec<f64>,
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

pub fn rows(steps: &[Step], samples: &[Vec<Sample>], size: u64) -> Vec<Row> {
    let mut rows: Vec<Row> = steps
        .iter()
        .zip(samples)
        .map(|(step, samples)| {
            let mut seconds: Vec<f64> = samples.iter().map(|sample| sample.seconds).collect();
            let median_seconds = median(&mut seconds.clone());
            seconds.sort_by(f64::total_cmp);
            Row {
                name: step.name,
                median_seconds,
                megabytes_per_second: size as f64 / median_seconds / 1e6,
                ratio_to_baseline: 0.0,
                peak_memory_bytes: samples.iter().filter_map(|sample| sample.peak_memory).max(),
                seconds,
            }
        })
        .collect();
    let baseline = rows[0].megabytes_per_second;
    for row in &mut rows {
        row.ratio_to_baseline = row.megabytes_per_second / baseline;
    }
    rows
}

pub fn table(rows: &[Row], size: u64, runs: usize, mix: &str, cold: bool) {
    println!(
        "disk: {} ({mix}); median of {runs} runs; MB/s over the virtual size; page cache {}",
        blockrep::units::format_size(size),
        if cold {
            "dropped before each step"
        } else {
            "warm"
        }
    );
    println!(
        "{:<34} {:>9} {:>9} {:>11} {:>10}",
        "line", "seconds", "MB/s", "x baseline", "peak mem"
    );
    for row in rows {
        let memory = row
            .peak_memory_bytes
            .map_or("-".to_string(), |bytes| format!("{} MiB", bytes >> 20));
        println!(
            "{:<34} {:>9.3} {:>9.0} {:>11.2} {:>10}",
            row.name, row.median_seconds, row.megabytes_per_second, row.ratio_to_baseline, memory
        );
    }
}

pub fn json(
    rows: &[Row],
    size: u64,
    runs: usize,
    mix: &str,
    cold: bool,
) -> serde_json::Result<String> {
    serde_json::to_string_pretty(&serde_json::json!({
        "scenario": "convert",
        "virtual_size": size,
        "runs": runs,
        "mix": mix,
        "cold_page_cache": cold,
        "lines": rows,
    }))
}
