import sys

from tbfleet import app

sys.exit(app.main())
