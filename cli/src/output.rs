//! Rendering: one place for tables and JSON.

use anyhow::Result;
use comfy_table::{presets::NOTHING, Table};
use serde::Serialize;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A row of a listing: its columns for tables, its fields (serde) for JSON.
pub trait Row: Serialize {
    const HEADER: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

pub fn print<R: Row>(format: Format, rows: &[R]) -> Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Format::Table => {
            let mut table = Table::new();
            table.load_preset(NOTHING).set_header(R::HEADER.to_vec());
            for row in rows {
                table.add_row(row.cells());
            }
            println!("{table}");
        }
    }
    Ok(())
}
