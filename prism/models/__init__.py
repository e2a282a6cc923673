"""Model families behind one interface: loading, processors, and the tiny/small model builder."""
