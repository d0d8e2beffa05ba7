#[derive(Debug)] pub struct Stats;
