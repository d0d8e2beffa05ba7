#[derive(Debug)] pub struct ReadAhead;
