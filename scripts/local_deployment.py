"""A SuperLink and N SuperNodes on loopback running fedapp: ``fedapp.deploy.local``'s command line.

    python scripts/local_deployment.py --nodes 2 --workdir /tmp/fedapp-deployment -- train.rounds=2
"""

from fedapp.deploy.local import main

if __name__ == "__main__":
    main()
