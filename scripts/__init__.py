"""Small scripts that check the trained model from the outside."""
