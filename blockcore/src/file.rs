//! Raw image file backend (being written).
#[derive(Debug)] pub struct FileDevice;
#[derive(Debug)] pub enum FileEngine {}
#[derive(Debug)] pub struct OpenOptions;
