"""Scripts around the BentoML model store: export, import (with verification) and verify."""
