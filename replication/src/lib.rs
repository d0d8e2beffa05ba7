//! The edge-origin link and write-behind journal shipping. Not yet built: see the streaming issue.
