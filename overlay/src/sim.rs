pub struct Sim;
